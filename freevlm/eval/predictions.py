"""predictions.jsonl: an evaluation's outputs, one record a line, appended and flushed as records complete, so a
run that dies keeps what it finished and a resumed run decodes only the rest.

Beside it, predictions.options.json holds what the lines depend on (model, exits, method, threshold, dataset,
decoding, batch size); resuming with anything else is refused, naming each difference, since two runs' outputs would
be mixed. A line cut short by a kill is dropped (and cut off the file) on resume. A timed batch's first line also
holds the parameters the batch touched (`work`, early exit and full), so a resumed run's ideal speedup counts it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PREDICTIONS = "predictions.jsonl"  # `freevlm eval`'s; a sweep keeps one per pass (`name`)


class PredictionLog:
    """The lines of `folder/predictions.jsonl`: `done` maps each finished record's index to its line.

    Every process reads (`resume`), only the main one writes (`open`, `append`)."""

    def __init__(self, folder: str | os.PathLike, options: dict, resume: bool = False, name: str = "predictions"):
        self.folder = Path(folder)
        self.path, self.options_path = self.folder / f"{name}.jsonl", self.folder / f"{name}.options.json"
        self.options = json.loads(json.dumps(options))  # as the file will hold them (tuples become lists)
        self.done: dict[int, dict] = {}
        self.resumed = resume and self.path.exists()
        if self.resumed:
            self._check_options()
            self.done = {row["index"]: row for row in _complete_lines(self.path)}
        self._file = None

    def _check_options(self) -> None:
        if not self.options_path.exists():
            raise ValueError(
                f"--resume: {self.path} has no {self.options_path.name} beside it: cannot tell what made it"
            )
        before = json.loads(self.options_path.read_text())
        differ = [
            f"{key}: {before.get(key)!r} in the file, {self.options.get(key)!r} now"
            for key in sorted(set(before) | set(self.options))
            if before.get(key) != self.options.get(key)
        ]
        if differ:
            raise ValueError(
                f"--resume: {self.path} was made with other options ({'; '.join(differ)}); "
                "resume with the same options or write to another folder"
            )

    def open(self) -> None:
        """Start writing (main process): a fresh file, or the resumed one without a line a kill cut short."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.resumed:
            text = self.path.read_bytes()
            complete = text[: text.rfind(b"\n") + 1]
            if len(complete) != len(text):
                self.path.write_bytes(complete)
        else:
            self.path.write_text("")
            self.options_path.write_text(json.dumps(self.options, indent=1))
        self._file = self.path.open("a")

    def append(self, rows: list[dict]) -> None:
        """One line per row (each holds its record's `index`), flushed so that a kill loses no finished line."""
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _complete_lines(path: Path) -> list[dict]:
    lines = path.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1] if line]  # the last piece: "" or a line a kill cut short
