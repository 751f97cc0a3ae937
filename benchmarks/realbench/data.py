"""The encoder track's four text-classification tasks, all from text that installs offline, and their splits.

=========== ======= =================================================================================
task        labels  source
=========== ======= =================================================================================
sentiment   2       VADER's lexicon (PyPI ``vadersentiment`` 3.3.2, ``vader_lexicon.txt``): words with
                    mean valence >= 1 (positive) or <= -1 (negative)
language    6       translated messages of Debian packages' gettext catalogs (``/usr/share/locale/LANG/
                    LC_MESSAGES/DOMAIN.mo`` for the DOMAINS below: apt, dpkg, coreutils, tar, ...):
                    de, fr, es, it, pt (pt and pt_BR), nl
topic       4       first paragraph of docstrings in CPython's standard library (this interpreter's, read
                    with ``ast``, nothing imported), grouped by package: network, concurrency,
                    formats, debugging
entity      4       ISO names from PyPI ``pycountry`` 26.2.16: countries (3166-1 names, official names,
                    3166-3 former countries), currencies (4217), languages (639-3 with a 2-letter code),
                    scripts (15924)
=========== ======= =================================================================================

Splits are by a hash of the text alone (never by position or seed): 15% validation, 25% test, the rest
train, so they are disjoint, the same for every seed and stable when a source gains or loses an entry.
A text found under two labels is dropped. The sources are located with ``importlib.util.find_spec`` and
read as files; nothing here imports the packages (vaderSentiment's module pulls in requests).
"""

from __future__ import annotations

import ast
import gettext
import hashlib
import importlib.util
import json
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")
TASKS = ("sentiment", "language", "topic", "entity")
LABELS: dict[str, tuple[str, ...]] = {
    "sentiment": ("negative", "positive"),
    "language": ("de", "fr", "es", "it", "pt", "nl"),
    "topic": ("network", "concurrency", "formats", "debugging"),
    "entity": ("country", "currency", "language", "script"),
}
# Catalogs of essential Debian packages, present for all six languages on Debian 12.
DOMAINS = ("apt", "libapt-pkg6.0", "dpkg", "coreutils", "findutils", "grep", "sed", "tar", "diffutils", "bash",
           "libc", "shadow", "adduser", "man-db", "wget", "make", "gettext-runtime")
LOCALES = {"de": ("de",), "fr": ("fr",), "es": ("es",), "it": ("it",), "pt": ("pt", "pt_BR"), "nl": ("nl",)}
LOCALE_ROOT = Path("/usr/share/locale")
STDLIB_PACKAGES = {
    "network": ("http", "urllib", "email", "smtplib.py", "ftplib.py", "imaplib.py", "poplib.py", "socket.py",
                "ssl.py", "socketserver.py", "xmlrpc", "mailbox.py", "nntplib.py"),
    "concurrency": ("asyncio", "concurrent", "threading.py", "multiprocessing", "queue.py", "sched.py",
                    "subprocess.py", "selectors.py"),
    "formats": ("json", "xml", "html", "csv.py", "configparser.py", "tomllib", "plistlib.py", "base64.py",
                "codecs.py", "zipfile.py", "tarfile.py", "gzip.py", "wave.py"),
    "debugging": ("unittest", "doctest.py", "pdb.py", "bdb.py", "trace.py", "cProfile.py", "profile.py",
                  "pstats.py", "timeit.py", "traceback.py", "inspect.py", "dis.py", "tracemalloc.py"),
}
MIN_CHARS, MAX_CHARS = 12, 200
VALIDATION_PER_TASK, TEST_PER_TASK = 150, 300  # caps, taken in hash order (scoring is the cost on 2 cores)


class DataError(SystemExit):
    """A source missing on this machine: one line naming it and what provides it."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def split_of(text: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(("realbench/" + text).encode()).digest()[:8], "big") % 100
    return "validation" if bucket < 15 else "test" if bucket < 40 else "train"


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"realbench: Python package {name} not found; pip install -r benchmarks/realbench/"
                        f"requirements.txt (it provides {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


# --- sources: (text, label name) pairs -------------------------------------------------------------------

def sentiment_pairs() -> list[tuple[str, str]]:
    lexicon = _package_dir("vaderSentiment", "vadersentiment") / "vader_lexicon.txt"
    pairs = []
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        token, valence = line.split("\t")[:2]
        if re.fullmatch(r"[a-z][a-z'-]+", token) and abs(float(valence)) >= 1.0:
            pairs.append((token, "positive" if float(valence) > 0 else "negative"))
    return pairs


def _catalog_strings(path: Path) -> list[str]:
    try:
        with path.open("rb") as handle:
            catalog = gettext.GNUTranslations(handle)._catalog
    except (OSError, UnicodeDecodeError):  # a catalog in a legacy charset: skipped, as if absent
        return []
    out = []
    for key, value in catalog.items():
        msgid = key[0] if isinstance(key, tuple) else key
        if not msgid or not isinstance(value, str) or value == msgid:  # header or untranslated
            continue
        text = " ".join(value.split())
        if MIN_CHARS <= len(text) <= MAX_CHARS:
            out.append(text)
    return out


def language_pairs() -> list[tuple[str, str]]:
    pairs = []
    for label, locales in LOCALES.items():
        for locale in locales:
            for domain in DOMAINS:
                path = LOCALE_ROOT / locale / "LC_MESSAGES" / f"{domain}.mo"
                if path.is_file():
                    pairs.extend((text, label) for text in _catalog_strings(path))
    if not pairs:
        raise DataError(f"realbench: no gettext catalogs under {LOCALE_ROOT} (Debian packages' translations; "
                        "an image built with localepurge or without /usr/share/locale lacks them)")
    return pairs


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                text = _first_paragraph(doc)
                if MIN_CHARS <= len(text) <= MAX_CHARS:
                    out.append(text)
    return out


def _source_files(stdlib: Path, entry: str) -> list[Path]:
    path = stdlib / entry
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.py") if not {"test", "tests"} & set(p.relative_to(stdlib).parts))


def topic_pairs() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pairs = []
    for label, entries in STDLIB_PACKAGES.items():
        for entry in entries:
            for path in _source_files(stdlib, entry):
                pairs.extend((text, label) for text in _docstrings(path))
    return pairs


def entity_pairs() -> list[tuple[str, str]]:
    databases = _package_dir("pycountry", "pycountry") / "databases"

    def entries(name: str) -> list[dict]:
        data = json.loads((databases / f"{name}.json").read_text(encoding="utf-8"))
        return next(iter(data.values()))

    pairs = []
    for entry in entries("iso3166-1"):
        pairs += [(entry[k], "country") for k in ("name", "official_name") if k in entry]
    pairs += [(e["name"], "country") for e in entries("iso3166-3")]
    pairs += [(e["name"], "currency") for e in entries("iso4217")]
    pairs += [(e["name"], "language") for e in entries("iso639-3") if "alpha_2" in e]
    pairs += [(e["name"], "script") for e in entries("iso15924")]
    return pairs


SOURCES = {"sentiment": sentiment_pairs, "language": language_pairs, "topic": topic_pairs, "entity": entity_pairs}


# --- datasets ----------------------------------------------------------------------------------------------

def unambiguous(pairs: list[tuple[str, str]], labels: tuple[str, ...]) -> list[Example]:
    """One example per distinct text, in hash order; texts seen under two labels are dropped."""
    seen: dict[str, set[str]] = {}
    for text, label in pairs:
        seen.setdefault(text, set()).add(label)
    kept = [Example(text, labels.index(next(iter(names)))) for text, names in seen.items() if len(names) == 1]
    return sorted(kept, key=lambda e: hashlib.sha256(e.text.encode()).hexdigest())


def task_splits(task: str) -> dict[str, list[Example]]:
    """train / validation / test of one task; validation and test capped, in hash order."""
    examples = unambiguous(SOURCES[task](), LABELS[task])
    splits = {split: [e for e in examples if split_of(e.text) == split] for split in SPLITS}
    splits["validation"] = splits["validation"][:VALIDATION_PER_TASK]
    splits["test"] = splits["test"][:TEST_PER_TASK]
    return splits


def load_all(tasks=TASKS) -> dict[str, dict[str, list[Example]]]:
    return {task: task_splits(task) for task in tasks}


def fingerprint(datasets: dict[str, dict[str, list[Example]]], splits=SPLITS) -> str:
    """A hash of every example of ``splits``: what the cached experts (train) and scores (all) depend on."""
    digest = hashlib.sha256()
    for task in sorted(datasets):
        for split in splits:
            for e in datasets[task][split]:
                digest.update(f"{task}\t{split}\t{e.label}\t{e.text}\n".encode())
    return digest.hexdigest()[:16]


def describe(datasets: dict[str, dict[str, list[Example]]]) -> dict:
    out = {}
    for task, splits in datasets.items():
        out[task] = {split: len(examples) for split, examples in splits.items()}
        counts = [0] * len(LABELS[task])
        for e in splits["test"]:
            counts[e.label] += 1
        out[task]["test_labels"] = dict(zip(LABELS[task], counts))
    return out
