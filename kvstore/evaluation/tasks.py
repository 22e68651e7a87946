"""RULER-style synthetic long-context tasks, generated locally (no downloads).

:func:`make_task` builds one deterministic task instance: a haystack of about
``n_tokens`` tokens (``"filler"``: the repeated sentences of the pass-key
demo; ``"text"``: real English prose shipped with Python, see
:func:`kvstore.datasets.text.long_text`) with one or more *needles* inserted
at a chosen depth, and a question that ends with an explicit answer format.
:func:`score` is exact match: the fraction of the expected answers that occur
in the model's output as whole words.

Kinds (after RULER, arXiv 2404.06654; the prompts are kept simple enough for
a 135M instruct model):

``niah_number``
    one needle ``The special magic number for <key> is <7 digits>.``
``niah_uuid``
    the same with a UUID as the value.
``multikey``
    four needles with different keys (the others are distractors); the
    question asks for one key's number.
``multivalue``
    four needles with the same key and different numbers; all four must be
    returned.
``multiquery``
    four needles with different keys; the question asks for the numbers of
    all four keys.
``vt``
    variable tracking: ``VAR ABCDE = 12345.`` then ``VAR FGHIJ = VAR ABCDE.``
    and so on (a chain of five variables); all variables that hold the value
    must be returned.

Placement: the needle the question is about (for ``multivalue`` /
``multiquery`` the first needle, for ``vt`` the assignment of the value)
sits at ``depth`` (0 = start of the haystack, 1 = end). The other needles get
seeded random depths; ``vt``'s later links keep their order after the first,
spread over ``(depth, 1]``.
"""
from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["Task", "KINDS", "HAYSTACKS", "FILLER", "make_task", "score", "count_tokens"]

KINDS = ("niah_number", "niah_uuid", "multikey", "multivalue", "multiquery", "vt")
HAYSTACKS = ("filler", "text")

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")

_ADJ = ("amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "kind",
        "lucky", "mellow", "noble", "olive", "proud", "quiet", "rapid", "silver", "tidy", "urban", "vivid",
        "warm", "young", "zesty")
_NOUN = ("apple", "bridge", "castle", "dragon", "engine", "forest", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pencil", "rabbit", "saddle", "tower", "violin",
         "wagon", "window", "yacht", "zebra", "canyon")

N_NEEDLES = 4      # multikey / multivalue / multiquery
VT_CHAIN = 5       # variables in the variable-tracking chain


@dataclass
class Task:
    """One task instance.

    Attributes:
        prompt: the user message (haystack + question), without chat template.
        answers: the strings that must occur in the output (:func:`score`).
        kind, depth, haystack: how it was made.
        needles: the inserted needle sentences, in prompt order.
        needle_depths: where each needle was inserted (fraction of the
            haystack's units before it), same order as ``needles``.
        seed, n_tokens: the generator's inputs.
        answer_prefix: the start of the answer (RULER's answer prefix);
            a harness puts it at the start of the model's turn so that the
            output is the answer itself, not an echo of the question.
    """

    prompt: str
    answers: list[str]
    kind: str
    depth: float
    haystack: str
    needles: list[str] = field(default_factory=list)
    needle_depths: list[float] = field(default_factory=list)
    seed: int = 0
    n_tokens: int = 0
    answer_prefix: str = ""


# --- tokens ------------------------------------------------------------------------
def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text``: a Hugging Face tokenizer (no special tokens), any
    callable returning ``{"input_ids": [...]}``, an object with ``encode``, or
    ``None`` (whitespace-separated words)."""
    if tokenizer is None:
        return len(text.split())
    if callable(tokenizer):
        try:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        except TypeError:
            ids = tokenizer(text)["input_ids"]
        return len(ids)
    return len(tokenizer.encode(text))


# --- haystacks ---------------------------------------------------------------------
def _units(haystack: str, n_tokens: int) -> tuple[list[str], str]:
    """Haystack units (insertion points lie between units) and their separator."""
    if haystack == "filler":
        return [FILLER.strip()] * (n_tokens + 1), "\n"   # more than enough; trimmed by the fit
    if haystack == "text":
        from ..datasets.text import long_text

        paras = [p.strip() for p in long_text(8 * n_tokens + 4096).split("\n\n") if p.strip()]
        return paras, "\n\n"
    raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")


# --- needles and questions ---------------------------------------------------------
def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in _ADJ for b in _NOUN], n)
    return [f"{a}-{b}" for a, b in pairs]


def _numbers(rng: random.Random, n: int, digits: int = 7) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if v not in out:
            out.append(v)
    return out


def _var_names(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in out and v != "VAR":
            out.append(v)
    return out


def _other_depths(rng: random.Random, n: int, depth: float) -> list[float]:
    """``n`` seeded depths in [0, 1], kept at least 0.05 away from ``depth``."""
    out: list[float] = []
    while len(out) < n:
        d = round(rng.random(), 3)
        if abs(d - depth) >= 0.05:
            out.append(d)
    return out


def _spec(kind: str, depth: float, rng: random.Random) -> tuple[str, list[tuple[float, str]], str, list[str], str]:
    """(intro, [(depth, needle)], question, answers, answer prefix)."""
    num_intro = ("Some special magic numbers are hidden inside the following text. "
                 "Find them and memorize them. I will ask you about them afterwards.")
    if kind == "niah_number":
        key, = _keys(rng, 1)
        val, = _numbers(rng, 1)
        return (num_intro, [(depth, f"The special magic number for {key} is {val}.")],
                f"What is the special magic number for {key}? Answer with the number only.", [val],
                f"The special magic number for {key} is")
    if kind == "niah_uuid":
        key, = _keys(rng, 1)
        val = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return ("A special magic UUID is hidden inside the following text. Find it and memorize it. "
                "I will ask you about it afterwards.",
                [(depth, f"The special magic UUID for {key} is {val}.")],
                f"What is the special magic UUID for {key}? Answer with the UUID only.", [val],
                f"The special magic UUID for {key} is")
    if kind in ("multikey", "multiquery"):
        keys = _keys(rng, N_NEEDLES)
        vals = _numbers(rng, N_NEEDLES)
        depths = [depth] + _other_depths(rng, N_NEEDLES - 1, depth)
        needles = [(d, f"The special magic number for {k} is {v}.") for d, k, v in zip(depths, keys, vals)]
        if kind == "multikey":
            return (num_intro, needles,
                    f"What is the special magic number for {keys[0]}? Answer with the number only.", [vals[0]],
                    f"The special magic number for {keys[0]} is")
        listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        return (num_intro, needles,
                f"What are the special magic numbers for {listed}? "
                "Answer with the numbers only, separated by commas.", vals,
                f"The special magic numbers for {listed} are")
    if kind == "multivalue":
        key, = _keys(rng, 1)
        vals = _numbers(rng, N_NEEDLES)
        depths = [depth] + _other_depths(rng, N_NEEDLES - 1, depth)
        needles = [(d, f"One of the special magic numbers for {key} is {v}.") for d, v in zip(depths, vals)]
        return (num_intro, needles,
                f"What are all the special magic numbers for {key}? "
                "Answer with the numbers only, separated by commas.", vals,
                f"The special magic numbers for {key} are")
    if kind == "vt":
        names = _var_names(rng, VT_CHAIN)
        val, = _numbers(rng, 1, digits=5)
        later = sorted(depth + (1.0 - depth) * rng.random() for _ in range(VT_CHAIN - 1))
        depths = [depth] + [round(d, 3) for d in later]
        needles = [(depths[0], f"VAR {names[0]} = {val}.")]
        needles += [(d, f"VAR {names[i + 1]} = VAR {names[i]}.") for i, d in enumerate(depths[1:])]
        return ("Memorize and track the chain of variable assignments hidden in the following text.",
                needles,
                f"Which variables are assigned the value {val}, directly or through other variables? "
                "Answer with the variable names only, separated by commas.", names,
                f"The variables assigned the value {val} are")
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _assemble(intro: str, units: Sequence[str], sep: str, needles: Sequence[tuple[float, str]],
              question: str) -> tuple[str, list[tuple[float, str]]]:
    """Insert needles between units (stable for equal depths) and frame the prompt."""
    n = len(units)
    at = sorted(((int(round(d * n)), i, s) for i, (d, s) in enumerate(needles)), key=lambda t: (t[0], t[1]))
    parts: list[str] = []
    j = 0
    for pos, _, s in at:
        parts.extend(units[j:pos])
        parts.append(s)
        j = pos
    parts.extend(units[j:])
    placed = [(pos / n if n else 0.0, s) for pos, _, s in at]
    return f"{intro}\n\n{sep.join(parts)}\n\n{question}", placed


def make_task(kind: str, n_tokens: int, depth: float, haystack: str = "filler", tokenizer: Any = None,
              seed: int = 0) -> Task:
    """A deterministic task instance of about ``n_tokens`` tokens.

    Args:
        kind: one of :data:`KINDS`.
        n_tokens: target prompt length in tokens of ``tokenizer`` (the chat
            template adds a few more).
        depth: where the asked needle sits in the haystack, in [0, 1].
        haystack: ``"filler"`` or ``"text"``.
        tokenizer: counts tokens (see :func:`count_tokens`); ``None`` counts
            whitespace-separated words.
        seed: the same ``(kind, seed)`` gives the same keys and values, and
            with the same other arguments the same prompt.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    rng = random.Random(f"kvstore-eval/{kind}/{seed}")
    intro, needles, question, answers, prefix = _spec(kind, depth, rng)
    pool, sep = _units(haystack, n_tokens)

    def build(m: int) -> tuple[str, list[tuple[float, str]]]:
        return _assemble(intro, pool[:m], sep, needles, question)

    # Estimate the unit count from per-unit token counts, then find the largest
    # count whose real prompt fits (merges across unit boundaries shift the sum).
    def fits(m: int) -> bool:
        return count_tokens(tokenizer, build(m)[0]) <= n_tokens

    budget = n_tokens - count_tokens(tokenizer, build(0)[0])
    sep_tokens = max(1, count_tokens(tokenizer, sep.strip()) if sep.strip() else 1)
    m, used = 0, 0
    while m < len(pool) and budget > 0:
        used += count_tokens(tokenizer, pool[m]) + sep_tokens
        if used > budget:
            break
        m += 1
    if fits(m):   # bracket [lo fits, hi does not] by growing steps, then bisect
        lo, step = m, 1
        hi = min(len(pool), lo + step)
        while hi > lo and fits(hi):
            lo, step = hi, 2 * step
            hi = min(len(pool), lo + step)
        if hi == lo:
            hi = lo + 1
    else:
        hi, step = m, 1
        lo = max(0, hi - step)
        while lo > 0 and not fits(lo):
            hi, step = lo, 2 * step
            lo = max(0, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    m = lo
    prompt, placed = build(m)
    return Task(prompt=prompt, answers=list(answers), kind=kind, depth=depth, haystack=haystack,
                needles=[s for _, s in placed], needle_depths=[d for d, _ in placed], seed=seed,
                n_tokens=n_tokens, answer_prefix=prefix)


# --- scoring -----------------------------------------------------------------------
def _occurs(answer: str, text: str) -> bool:
    """``answer`` occurs in ``text`` as a whole word (not inside a longer number or name)."""
    pat = r"(?<![0-9A-Za-z])" + re.escape(answer.lower()) + r"(?![0-9A-Za-z])"
    return re.search(pat, text.lower()) is not None


def score(task: Task, output_text: str) -> float:
    """Exact match: the fraction of ``task.answers`` that occur in ``output_text``
    as whole words (case-insensitive). One answer: 1.0 or 0.0."""
    if not task.answers:
        return 1.0
    return sum(_occurs(a, output_text) for a in task.answers) / len(task.answers)
