"""Own-block routing loss, a remedy that is off by default (docs/router.md): while task t trains, teach
the router to send task t's training inputs to block t.

    L_own = - mean over the micro-batch's inputs of log a_t(x)

Training knows which task an input comes from; inference does not, and still routes by a(x) alone. ARM
pulls earlier tasks' pseudo inputs toward the routing they had; this term is its counterpart on the
current task's inputs. Together they form a contrast that only the input-dependent part of q(x) can
satisfy, where ARM alone is lowered fastest by moving every input's routing alike.
"""

from __future__ import annotations

import torch

from .router import to_log_weights


def own_block_loss(model, inputs: dict) -> torch.Tensor | None:
    """-mean log a_t(x) of the batch's inputs, t the newest block (None: nothing to route between)."""
    if model.router is None or model.num_blocks < 2:
        return None
    logits = model.routing_logits(inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels"))
    return -to_log_weights(logits)[:, -1].mean()
