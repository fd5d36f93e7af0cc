"""Stop conditions of a request: what ends it on its generated text (`SearchConfig.stop`).

A stop condition is a string, which ends the request once the generated text contains it, or a
predicate on the generated text, such as `boxed_closed` for math answers.
"""
from __future__ import annotations

from typing import Callable, Union

StopCondition = Union[str, Callable[[str], bool]]


def boxed_closed(text: str) -> bool:
    """Stop condition for math: the text holds a ``\\boxed{...}`` whose braces are closed."""
    start = text.find("\\boxed{")
    while start != -1:
        depth = 0
        for ch in text[start + len("\\boxed"):]:
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return True
        start = text.find("\\boxed{", start + 1)
    return False
