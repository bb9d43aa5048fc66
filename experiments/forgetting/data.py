"""Task A (arithmetic and algebra problems generated from a seed) and task B (English prose from the
Python 3.11 documentation that Debian's ``python3.11-doc`` installs), both as bytes.

Tokenizer: byte-level, vocabulary 256, the same for every arm. ``prepare_prose`` cleans the
reStructuredText sources once into ``experiments/forgetting/data/prose.json`` (train / val / test paragraphs, split by file).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from forgetting import HOME

VOCAB = 256
NEWLINE = ord("\n")
RST_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
PROSE_FILE = HOME / "data" / "prose.json"
SOURCE_NOTE = (
    "Python 3.11 documentation sources (reStructuredText) from Debian's python3.11-doc package, "
    "/usr/share/doc/python3.11/html/_sources/, PSF License Version 2"
)


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- task A: problems as text
def _problem(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("add", "add", "sub", "add3", "two_step", "linear"))
    if kind == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a}+{b}=", str(a + b)
    if kind == "sub":
        a, b = sorted((rng.randrange(100), rng.randrange(100)), reverse=True)
        return f"{a}-{b}=", str(a - b)
    if kind == "add3":
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        return f"{a}+{b}=", str(a + b)
    if kind == "two_step":
        a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
        return f"{a}+{b}+{c}=", str(a + b + c)
    x, c = rng.randrange(100), rng.randrange(100)
    return f"x+{c}={x + c}, x=", str(x)


def _split_of(question: str) -> str:
    bucket = int(hashlib.sha1(question.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


@dataclass
class MathTask:
    """Problems split by problem (a hash of the question), so no test question is ever trained on.
    ``train`` is a sample with repetition from the training problems; val and test are distinct problems."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]

    @classmethod
    def generate(cls, seed: int = 1234, n_train: int = 200_000, n_val: int = 500, n_test: int = 1000) -> "MathTask":
        rng = random.Random(seed)
        train: list[tuple[str, str]] = []
        held: dict[str, dict[str, str]] = {"val": {}, "test": {}}
        want = {"val": n_val, "test": n_test}
        while len(train) < n_train or any(len(held[s]) < want[s] for s in held):
            q, a = _problem(rng)
            split = _split_of(q)
            if split == "train":
                if len(train) < n_train:
                    train.append((q, a))
            elif len(held[split]) < want[split]:
                held[split][q] = a
        return cls(train, sorted(held["val"].items()), sorted(held["test"].items()))

    @staticmethod
    def line(q: str, a: str) -> str:
        return f"Q: {q} A: {a}\n"

    def stream(self, seed: int) -> torch.Tensor:
        """All training problems, shuffled, as one byte stream (uint8)."""
        items = list(self.train)
        random.Random(seed).shuffle(items)
        return torch.tensor(encode("".join(self.line(q, a) for q, a in items)), dtype=torch.uint8)


# ---------------------------------------------------------------- task B: prose from reStructuredText
_CODE_DIRECTIVES = {
    "code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "testsetup", "testcleanup",
    "productionlist", "literalinclude", "highlight", "raw", "csv-table", "list-table", "table", "toctree",
    "index", "image", "figure", "math", "graphviz", "only", "include", "sectionauthor", "moduleauthor",
    "tabularcolumns", "audit-event", "opcode", "cmdoption", "option", "envvar", "availability",
}
_ROLE = re.compile(r":[\w:+-]+:`(?:[^`<]*<)?([^`>]*)>?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
_LITERAL = re.compile(r"``([^`]+)``")
_MARK = re.compile(r"(\*\*|\*|`)([^*`]+)\1_?")
_REF = re.compile(r"\[#?\w*\]_|\|\w+\|")


def _clean_inline(text: str) -> str:
    text = _ROLE.sub(lambda m: m.group(1).lstrip("!~"), text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _MARK.sub(r"\2", text)
    text = _REF.sub("", text)
    text = re.sub(r"\s*::$", ":", text)
    text = re.sub(r"^([*-]|#\.|\d+\.)\s+", "", text)
    return re.sub(r"\s+", " ", text).strip()


def rst_paragraphs(source: str) -> list[str]:
    """English paragraphs of one .rst file: directives, literal blocks, tables and titles dropped."""
    paragraphs, current, skip_deeper_than = [], [], None

    def flush():
        if current:
            text = _clean_inline(" ".join(current))
            letters = sum(c.isalpha() or c == " " for c in text)
            if len(text) >= 60 and letters / len(text) > 0.85 and text[-1] in ".:?!)":
                paragraphs.append(text)
            current.clear()

    for raw in source.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip())
        if not line:
            flush()
            continue
        if skip_deeper_than is not None:
            if indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        stripped = line.strip()
        directive = re.match(r"\.\.\s+([\w:-]+)::", stripped)
        if stripped.startswith(".."):
            flush()
            name = directive.group(1) if directive else None
            if name is None or name in _CODE_DIRECTIVES:  # comment, target or code: skip its body
                skip_deeper_than = indent
            continue
        if re.fullmatch(r"[=\-~^*#+\"'`.|:_ ]{3,}.*", stripped) and not re.search(r"[A-Za-z]{3}", stripped[:3]):
            current.clear()  # title underline, table rule or table row start: drop
            continue
        if stripped.startswith((":", ">>>", "|", "+")):
            flush()
            continue
        current.append(stripped)
        if stripped.endswith("::"):
            flush()
            skip_deeper_than = indent  # a literal block follows
    flush()
    return paragraphs


def prepare_prose(sources: Path = RST_SOURCES, out: Path = PROSE_FILE) -> dict:
    """Clean every ``*.rst.txt`` under ``sources`` into ``out`` (split by file: 90/5/5)."""
    files = sorted(sources.rglob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(
            f"no reStructuredText under {sources}; install it with "
            "`apt-get update && apt-get install -y python3.11-doc` (PSF licence), then run prepare again"
        )
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for path in files:
        name = str(path.relative_to(sources))
        bucket = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 20
        split = "test" if bucket == 0 else "val" if bucket == 1 else "train"
        splits[split].extend(rst_paragraphs(path.read_text(encoding="utf-8", errors="replace")))
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"source": SOURCE_NOTE, "files": len(files), **splits}
    out.write_text(json.dumps(payload))
    return {k: sum(len(p) for p in v) for k, v in splits.items()}


def prepare_docstrings(out: Path) -> dict:
    """A small stand-in corpus from the standard library's own docstrings, for the smoke test on
    machines without ``python3.11-doc``."""
    import importlib
    import sys

    paragraphs = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"}:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001  (platform-specific modules)
            continue
        for part in (module.__doc__ or "").split("\n\n"):
            text = " ".join(part.split())
            if len(text) >= 60 and sum(c.isalpha() or c == " " for c in text) / len(text) > 0.85:
                paragraphs.append(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = len(paragraphs)
    payload = {"source": "docstrings of the Python standard library (smoke test stand-in)", "files": 0,
               "train": paragraphs[: n - n // 5], "val": paragraphs[n - n // 5 : n - n // 10], "test": paragraphs[n - n // 10 :]}
    out.write_text(json.dumps(payload))
    return {k: sum(len(p) for p in payload[k]) for k in ("train", "val", "test")}


def load_prose(path: Path = PROSE_FILE) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python experiments/forgetting/run.py prepare` first")
    payload = json.loads(path.read_text())
    return {
        split: torch.tensor(encode("\n".join(payload[split]) + "\n"), dtype=torch.uint8)
        for split in ("train", "val", "test")
    }


# ---------------------------------------------------------------- batches
def window_starts(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator, count: int = 1) -> torch.Tensor:
    """Start offsets of ``count`` batches of random windows: [count, batch] int64. Drawing all of a phase's
    batches at once gives the same numbers as drawing them one batch at a time from the same generator."""
    return torch.randint(0, len(stream) - seq_len - 1, (count, batch), generator=gen)


def gather_windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The windows of ``seq_len + 1`` bytes at ``starts`` [batch], on the stream's device: [batch, seq_len + 1] int64."""
    return stream[starts[:, None] + torch.arange(seq_len + 1, device=stream.device)].long()


def random_windows(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` bytes: [batch, seq_len + 1] int64."""
    return gather_windows(stream, window_starts(stream, batch, seq_len, gen)[0], seq_len)


def fixed_windows(stream: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """``count`` evenly spaced windows, the same every call: held-out loss."""
    step = max(1, (len(stream) - seq_len - 1) // count)
    return torch.stack([stream[i * step : i * step + seq_len + 1] for i in range(count)]).long()
