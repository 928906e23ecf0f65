r"""Gradients routed separately to the model (decoder) and the guide (encoder) in one backward
pass, for PIWAE and DReG: a surrogate loss whose value is the bound's and whose gradient gives
each side its own weights of the particles."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.objectives.draws import Draws

_MIN_WEIGHT = 1e-20
"""Decoder weights a_k below this are raised to it in the routed surrogate, so that the guide's
share b_k survives the rescaling; the change to the decoder's gradient, at most 1e-20 per
particle, is far below float32 resolution."""



def routed_surrogate(draws: Draws, value: Tensor, decoder_weights: Tensor,
                      encoder_weights: Tensor, kl_weight: float) -> Tensor:
    """A loss whose value is ``value`` and whose gradient is

        - sum_kn a_kn d log w_kn / d theta   for the model's parameters theta,
        - sum_kn b_kn d log w_kn / d phi     for the guide's parameters phi,

    with a = ``decoder_weights``, b = ``encoder_weights`` (``[K, N]``, treated as constants),
    times the subsampling scale of the draws. The model term a_kn log p(x_n, z'_kn) is
    evaluated on views z' of the draws whose incoming gradient is multiplied by b_kn / a_kn, so
    the pathwise part reaching phi through z carries b; the guide term b_kn log q(z_kn | x_n)
    carries b directly. One forward and one backward pass, as for IWAE. Outside autograd the
    value alone is returned.
    """
    if not torch.is_grad_enabled():
        return value
    a = decoder_weights.detach().clamp(min=_MIN_WEIGHT)
    b = encoder_weights.detach()
    ratio = b / a
    for z, event_dim in draws.routes:
        if z.requires_grad:
            factor = draws.per_draw(ratio, z, event_dim)
            z.register_hook(lambda grad, factor=factor: grad * factor)
    model_term = (a * (draws.log_likelihood + kl_weight * draws.log_prior)).sum()
    guide_term = (b * kl_weight * draws.log_q).sum()
    surrogate = -draws.scale * (model_term - guide_term)
    return value.detach() + surrogate - surrogate.detach()
