"""The result file of ``imgsim main``: its run ids, artifact URIs and headline metrics, for the steps after it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from imgsim import atomic
from imgsim.errors import ImgsimError

# The metrics a newcomer reads first, in this order; the rest follow alphabetically.
HEADLINE = ("accuracy", "precision_at_1", "precision_at_10", "map_at_r", "index_recall_at_10", "gallery_size")


@dataclasses.dataclass(frozen=True)
class MainResult:
    """What one ``main`` run made: the three stage runs (nested in ``main``), the model and the bundle."""

    main: str
    split: str
    train: str
    extract: str
    model_uri: str
    bundle_uri: str
    metrics: dict[str, float]

    @property
    def manifest_uri(self) -> str:
        return f"runs:/{self.split}/split"

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON, atomically."""
        atomic.write_text(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "MainResult":
        """Read a file :meth:`save` wrote; a one-line error naming the file and how to make one otherwise."""
        hint = ("it is written by `imgsim main --result-file FILE` (`mlflow run . -e main -P result_file=FILE`); "
                "run the pipeline first or name the right file")
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ImgsimError(f"no result file at {path}: {hint}") from None
        except (OSError, ValueError) as exc:
            raise ImgsimError(f"cannot read the result file {path} ({exc}): {hint}") from None
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if not isinstance(data, dict) or n not in data]
        if missing:
            raise ImgsimError(f"result file {path} lacks {', '.join(missing)}: {hint}")
        return cls(**{n: data[n] for n in names})

    def summary(self) -> str:
        """One line: the main run and the headline metrics it has."""
        shown = ", ".join(f"{name} {_number(self.metrics[name])}" for name in HEADLINE[:-1] if name in self.metrics)
        return f"run {self.main}" + (f": {shown}" if shown else "")

    def report(self) -> str:
        """The runs and metrics as a small table for a terminal."""
        order = [m for m in HEADLINE if m in self.metrics] + sorted(set(self.metrics) - set(HEADLINE))
        width = max(map(len, order + ["bundle"]))
        lines = [f"{'run':<{width}}  id"] + [f"{stage:<{width}}  {getattr(self, stage)}"
                                              for stage in ("main", "split", "train", "extract")]
        lines += [f"{'model':<{width}}  {self.model_uri}", f"{'bundle':<{width}}  {self.bundle_uri}", "",
                  f"{'metric':<{width}}  value"]
        lines += [f"{name:<{width}}  {_number(self.metrics[name])}" for name in order]
        return "\n".join(lines)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}"
