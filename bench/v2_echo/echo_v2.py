"""An echo model in MLServer: the Open Inference Protocol stack's ceiling for bench/serving.py, as
bench/EchoModel.py is the Seldon wrapper's. It answers each input tensor back as an output, parsing nothing."""

from __future__ import annotations

from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


class EchoRuntime(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        return InferenceResponse(model_name=self.name, outputs=[
            ResponseOutput(name=i.name, datatype=i.datatype, shape=i.shape, data=i.data) for i in payload.inputs])
