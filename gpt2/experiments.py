"""The shipped experiment files (``experiments/*.toml``): each is headed by the claim it tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    claim: str  # the file's leading comment, up to its "Run:" line


def experiments(folder: Path = EXPERIMENTS_DIR) -> list[Experiment]:
    out = []
    for path in sorted(folder.glob("*.toml")):
        lines = []
        for line in path.read_text().splitlines():
            if not line.startswith("#") or line.lstrip("# ").startswith(("Run:", "CPU scale:")):
                break
            lines.append(line.lstrip("#").strip())
        claim = " ".join(lines).removeprefix("Claim:").strip()
        out.append(Experiment(path.stem, path, claim))
    return out


def format_experiments(folder: Path = EXPERIMENTS_DIR) -> str:
    """One paragraph per experiment: its name, the claim and the command that runs it."""
    blocks = []
    for e in experiments(folder):
        rel = e.path.relative_to(folder.parent) if folder.parent in e.path.parents else e.path
        blocks.append(f"{e.name}\n  {e.claim}\n  python gpt2/train.py --config {rel}")
    return "\n\n".join(blocks) if blocks else f"no experiment files in {folder}"
