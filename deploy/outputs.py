"""The scheduler's token messages of one request, turned into what the client is told.

A message is `{"token_ids": [...], "finish_reason": str | None, "logprobs": [float | None, ...],
"top_logprobs": [[(token_id, logprob), ...] | None, ...]}` (the last two optional, one entry per
token). Each becomes a `Delta`: the new text (stop strings cut, the text of a stop token never
shown), the finish reason, the completion tokens counted so far (none past a stop string: the
token that completes it is the last one counted), and the tokens' logprobs when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deploy.detokenize import TextStream
from deploy.responses import SampledToken


@dataclass
class Delta:
    text: str
    finish_reason: str | None
    completion_tokens: int  # so far, in all
    tokens: list[SampledToken] = field(default_factory=list)  # this delta's, with logprobs


class OutputAssembler:
    def __init__(self, tokenizer: Any, stop: list[str], logprobs: bool) -> None:
        self.text = TextStream(tokenizer, stop)
        self.logprobs = logprobs
        self.completion_tokens = 0

    def feed(self, msg: dict) -> Delta:
        ids: list[int] = msg["token_ids"]
        reason: str | None = msg["finish_reason"]
        # The scheduler finishes with "stop" on the token that stopped it (EOS or one of the
        # request's stop_token_ids): the token is generated and counted, its text not shown.
        shown = len(ids) - 1 if reason == "stop" and ids else len(ids)
        text, taken = self._detokenize(ids[:shown])
        if not self.text.stopped:
            taken = len(ids)
        finish = "stop" if self.text.stopped else reason
        if finish:
            text += self.text.flush()
        self.completion_tokens += taken
        return Delta(text, finish, self.completion_tokens, self._tokens(msg, taken))

    def _detokenize(self, ids: list[int]) -> tuple[str, int]:
        """(new text, tokens taken): with stop strings one token at a time, so the count stops
        at the token that completes a stop string."""
        if not self.text.stop:
            return self.text.add(ids), len(ids)
        taken = len(ids)
        for n, token_id in enumerate(ids, 1):
            if self.text.extend([token_id]):
                taken = n
                break
        return self.text.emit(), taken

    def _tokens(self, msg: dict, n: int) -> list[SampledToken]:
        if not self.logprobs:
            return []
        ids = msg["token_ids"][:n]
        lps = msg.get("logprobs") or []
        tops = msg.get("top_logprobs") or []
        out = []
        for i, token_id in enumerate(ids):
            lp = lps[i] if i < len(lps) else None
            top = tops[i] if i < len(tops) else None
            out.append(SampledToken(token_id, float("nan") if lp is None else float(lp),
                                    tuple((int(t), float(v)) for t, v in top or ())))
        return out
