"""Draft tokens for speculative decoding by prompt lookup (n-gram matching).

A model that summarises, answers from a passage, edits code or continues a conversation often
repeats text it has already seen. Prompt lookup (Saxena 2023; transformers'
`prompt_lookup_num_tokens`, vLLM's "ngram" speculator) drafts the next tokens by finding the
latest earlier occurrence of the sequence's last n tokens and proposing what followed it. The
model then checks all the drafted tokens in one forward (`Engine(speculate=k)`). A greedy
sequence keeps every token up to the first one the model would not have chosen, plus the model's
own choice there; a sampled one keeps each draft token with the probability the model gives it
(`lmforge.infer.sampling.speculative_sample`). Either way the output has the distribution of
decoding one token at a time (greedy: the very same tokens in fp32, as the tests check; in bf16 a
near tie may break the other way, as it may between batch sizes), and a step can yield several
tokens for little more than the cost of one.
"""

from __future__ import annotations

from typing import Sequence


class NgramDrafter:
    """The sequence so far, indexed by its n-grams (n = 1 .. `max_n`): where each was last followed by a token."""

    def __init__(self, tokens: Sequence[int], max_n: int = 3, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self._next: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]  # n -> n-gram -> index of its follower
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        seq, index = self.tokens, self._next
        for t in tokens:
            end = len(seq)  # the n-grams ending here are now followed by `t`, at index `end`
            for n in range(1, min(self.max_n, end) + 1):
                index[n][tuple(seq[end - n:end])] = end
            seq.append(t)

    def draft(self, k: int) -> list[int]:
        """`k` tokens: those that followed the latest earlier occurrence of the longest suffix found
        (at least `min_n` long). When they run into the end of the sequence, the rule applied again
        repeats them: the tail is periodic (a loop of newlines drafts k newlines)."""
        seq = self.tokens
        for n in range(min(self.max_n, len(seq)), self.min_n - 1, -1):
            at = self._next[n].get(tuple(seq[len(seq) - n:]))
            if at is not None:
                out, period = seq[at:at + k], len(seq) - at
                while len(out) < k:
                    out.append(out[len(out) - period])
                return out
        return []
