"""A generated language-modelling task whose corruption is measurable: each example is a prompt of digits and its
answer (the digits reversed, or the sum of two numbers), and a share of the training examples have a wrong answer."""

from __future__ import annotations

import numpy as np

VOCAB = [*"0123456789", "+", "=", "<eos>"]
SEQUENCE_TASKS = ("reverse", "add")


def encode(text: str) -> list[int]:
    """Token ids of a string of digits, `+` and `=`."""
    return [VOCAB.index(c) for c in text]


def _problem(task: str, length: int, rng: np.random.Generator) -> tuple[str, str]:
    if task == "reverse":
        digits = "".join(map(str, rng.integers(0, 10, length)))
        return digits + "=", digits[::-1]
    a, b = (int(rng.integers(0, 10**length)) for _ in range(2))
    return f"{a:0{length}d}+{b:0{length}d}=", f"{a + b:0{length + 1}d}"


def _wrong(answer: str, rng: np.random.Generator) -> str:
    while True:
        wrong = "".join(map(str, rng.integers(0, 10, len(answer))))
        if wrong != answer:
            return wrong


def make_sequence_lm_splits(
    task: str = "reverse",
    length: int = 5,
    num_train: int = 2000,
    num_meta: int = 64,
    num_test: int = 500,
    corruption: float = 0.5,
    seed: int = 0,
):
    """Train / meta / test splits of a generated sequence task for a causal LM, as `datasets.Dataset`s in torch format
    with `input_ids`, `attention_mask`, `labels` (the prompt masked with -100: the loss is on the answer and `<eos>`)
    and `corrupted` (whether the answer is wrong). Every sequence has the same length.

    Args:
        task (`str`, *optional*, defaults to `"reverse"`): `"reverse"` (`01234=43210`) or `"add"` (`012+345=0357`).
        length (`int`, *optional*, defaults to 5): digits of the prompt's number(s).
        num_train, num_meta, num_test (`int`): examples per split; the three splits share no prompt.
        corruption (`float`, *optional*, defaults to 0.5): share of training examples whose answer is replaced by
            random digits; the meta and test splits are clean.
        seed (`int`, *optional*, defaults to 0): seed of the examples and of which are corrupted.

    Returns:
        `datasets.DatasetDict` with `train`, `meta` and `test`.
    """
    import datasets

    if task not in SEQUENCE_TASKS:
        raise ValueError(f"task={task!r} is not a sequence task: choose one of {SEQUENCE_TASKS}.")
    if not 0 <= corruption <= 1:
        raise ValueError(f"corruption must be in [0, 1], got {corruption}.")
    total = num_train + num_meta + num_test
    space = 10**length if task == "reverse" else 10 ** (2 * length)
    if total > space // 2:
        raise ValueError(f"{total} distinct examples of {task!r} with length={length} need a larger `length`.")
    rng = np.random.default_rng(seed)
    problems: dict[str, str] = {}
    while len(problems) < total:
        prompt, answer = _problem(task, length, rng)
        problems.setdefault(prompt, answer)
    items = list(problems.items())
    corrupted = np.zeros(total, dtype=bool)
    corrupted[rng.choice(num_train, round(corruption * num_train), replace=False)] = True

    def split(rows: range) -> datasets.Dataset:
        columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "corrupted": []}
        for i in rows:
            prompt, answer = items[i]
            answer = _wrong(answer, rng) if corrupted[i] else answer
            ids = [*encode(prompt + answer), VOCAB.index("<eos>")]
            columns["input_ids"].append(ids)
            columns["attention_mask"].append([1] * len(ids))
            columns["labels"].append([-100] * len(prompt) + ids[len(prompt) :])
            columns["corrupted"].append(bool(corrupted[i]))
        return datasets.Dataset.from_dict(columns).with_format("torch")

    return datasets.DatasetDict(
        train=split(range(num_train)),
        meta=split(range(num_train, num_train + num_meta)),
        test=split(range(num_train + num_meta, total)),
    )
