"""The decoder track's three generation tasks, all from data that installs offline, and their splits.

=========== =====================================================================================================
task        source
=========== =====================================================================================================
iso         ISO code conversion, from PyPI ``pycountry`` 26.2.16 (its JSON databases, read as files): a
            country's ISO 3166-1 alpha-2 code from its name and alpha-3 code (``Germany (DEU)`` -> ``DE``), a
            language's ISO 639-1 code from its name and 639-3 code (``German (deu)`` -> ``de``)
accent      a letter -> the diacritic its Unicode name gives after WITH, lower case (``é`` -> ``acute``,
            ``ṏ`` -> ``tilde and diaeresis``), from this interpreter's ``unicodedata``: the letters of Latin-1,
            Latin Extended-A/B and Additional, Greek and Cyrillic whose name has a WITH
module      a public top-level function of CPython's standard library -> the module that defines it
            (``urlsplit`` -> ``urllib.parse``), read with ``ast`` from this interpreter's stdlib (nothing imported);
            a name defined in two modules is dropped
=========== =====================================================================================================

Every example is a prompt ``Q: ...\\nA:`` and a short answer (a few tokens); a model is scored by exact match of
its greedy continuation: the answer's tokens, then the end of sequence or a new line (``decoder.Scorer``).
Splits are by a hash of the prompt alone (``data.split_of``: 15% validation, 25% test, the rest train), so they
are disjoint, the same for every seed and stable when a source gains or loses an entry.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from benchmarks.realbench import data

TASKS = ("iso", "accent", "module")
VALIDATION_PER_TASK, TEST_PER_TASK = 50, 100  # caps in hash order: greedy generation is the cost on 2 cores
UNICODE_RANGES = ((0x00C0, 0x00FF), (0x0100, 0x017F), (0x0180, 0x024F), (0x1E00, 0x1EFF), (0x0370, 0x03FF),
                  (0x0400, 0x04FF))
# Stdlib trees that are tests, demos, private or GUI: their functions are not what a user means by "the module".
SKIPPED_STDLIB = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "distutils",
                  "site-packages", "dist-packages", "pydoc_data", "__pycache__", "encodings", "config-3.11"}


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def prompt(question: str) -> str:
    return f"Q: {question}\nA:"


def target(answer: str) -> str:
    """What follows the prompt in training and what greedy decoding must produce: a space, then the answer."""
    return " " + answer


# --- sources: (question, answer) pairs ---------------------------------------------------------------------

def iso_pairs() -> list[tuple[str, str]]:
    databases = data._package_dir("pycountry", "pycountry") / "databases"

    def entries(name: str) -> list[dict]:
        return next(iter(json.loads((databases / f"{name}.json").read_text(encoding="utf-8")).values()))

    pairs = [(f"ISO 3166 alpha-2 code of {e['name']} ({e['alpha_3']})?", e["alpha_2"]) for e in entries("iso3166-1")]
    pairs += [(f"ISO 639-1 code of {e['name']} ({e['alpha_3']})?", e["alpha_2"]) for e in entries("iso639-3")
              if "alpha_2" in e]
    return pairs


def accent_pairs() -> list[tuple[str, str]]:
    pairs = []
    for first, last in UNICODE_RANGES:
        for code in range(first, last + 1):
            char = chr(code)
            _, with_, diacritic = unicodedata.name(char, "").partition(" WITH ")
            if with_ and unicodedata.category(char).startswith("L"):
                pairs.append((f"Which diacritic does {char} carry?", diacritic.lower()))
    return pairs


def _module_name(stdlib: Path, path: Path) -> str | None:
    parts = list(path.relative_to(stdlib).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or any(p.startswith("_") or p in SKIPPED_STDLIB or "-" in p for p in parts):
        return None
    return ".".join(parts)


def _public_functions(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    return [node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_")]


def module_pairs(stdlib: Path | None = None) -> list[tuple[str, str]]:
    stdlib = stdlib or Path(sysconfig.get_paths()["stdlib"])
    defined: dict[str, set[str]] = {}
    for path in sorted(stdlib.rglob("*.py")):
        module = _module_name(stdlib, path)
        if module:
            for name in _public_functions(path):
                defined.setdefault(name, set()).add(module)
    return [(f"Which stdlib module defines {name}()?", next(iter(modules)))
            for name, modules in defined.items() if len(modules) == 1]


SOURCES = {"iso": iso_pairs, "accent": accent_pairs, "module": module_pairs}


# --- datasets ----------------------------------------------------------------------------------------------

def unambiguous(pairs: list[tuple[str, str]]) -> list[Example]:
    """One example per distinct question, in hash order; a question with two answers is dropped."""
    seen: dict[str, set[str]] = {}
    for question, answer in pairs:
        seen.setdefault(question, set()).add(answer)
    kept = [Example(prompt(q), next(iter(a))) for q, a in seen.items() if len(a) == 1]
    return sorted(kept, key=lambda e: hashlib.sha256(e.prompt.encode()).hexdigest())


def task_splits(task: str) -> dict[str, list[Example]]:
    examples = unambiguous(SOURCES[task]())
    splits = {split: [e for e in examples if data.split_of(e.prompt) == split] for split in data.SPLITS}
    splits["validation"] = splits["validation"][:VALIDATION_PER_TASK]
    splits["test"] = splits["test"][:TEST_PER_TASK]
    return splits


def load_all(tasks=TASKS) -> dict[str, dict[str, list[Example]]]:
    return {task: task_splits(task) for task in tasks}


def fingerprint(datasets: dict[str, dict[str, list[Example]]], splits=data.SPLITS) -> str:
    digest = hashlib.sha256()
    for task in sorted(datasets):
        for split in splits:
            for e in datasets[task][split]:
                digest.update(f"{task}\t{split}\t{e.prompt}\t{e.answer}\n".encode())
    return digest.hexdigest()[:16]


def describe(datasets: dict[str, dict[str, list[Example]]]) -> dict:
    return {task: {split: len(examples) for split, examples in splits.items()} for task, splits in datasets.items()}
