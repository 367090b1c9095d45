"""An echo model in the same Seldon wrapper: the serving stack's ceiling for bench/serving.py."""


class EchoModel:
    """Returns the request unchanged, so only Seldon's parsing and transport are measured."""

    def predict_raw(self, request):
        return request
