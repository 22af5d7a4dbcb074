"""Command lines for the CLI tests, one option a keyword: `cli_args("eval", checkpoint=c, files=[q, a], threshold=1)`
is `["eval", "--backbone", "c/backbone", "--exits", "c/exits", "--files", "q", "a", "--threshold", "1"]`."""

from pathlib import Path


def cli_args(command: str, *flags: str, checkpoint: Path | None = None, **options) -> list[str]:
    """`checkpoint`: a folder with `backbone` and `exits` in it (conftest's `checkpoint`). An option's underscores
    become dashes; a list gives several values, True a bare flag; `flags` go last, as they are."""
    if checkpoint is not None:
        options = {"backbone": checkpoint / "backbone", "exits": checkpoint / "exits", **options}
    args = [command]
    for name, value in options.items():
        args.append("--" + name.replace("_", "-"))
        if value is not True:
            args += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return [*args, *flags]
