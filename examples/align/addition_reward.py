"""The verifiable reward of the GRPO example: 1 for the right sum, 0 otherwise.

lmforge calls it as `correct(prompt, completion)`; name it in a recipe as
`examples/align/addition_reward.py:correct`.
"""

import re


def correct(prompt: str, completion: str) -> float:
    """1.0 when `completion` is exactly the sum asked for by a prompt like "3+4=", else 0.0."""
    a, b = (int(x) for x in re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups())
    return float(completion.strip() == str(a + b))
