"""moebal's router inside Hugging Face ``transformers`` MoE models.

``patch_model(model, balancer="bip")`` finds every MoE router module of a ``transformers``
model (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``, ... see ``SUPPORTED_ROUTERS``) and
makes it route through a :class:`moebal.routing.Router`:

- the model's own gate weight computes the logits exactly as the model does;
- the balancer chooses the experts;
- the gate weights come from the unbiased scores by the model's own convention (softmax or
  sigmoid, renormalised over the K chosen experts when the model does, times the model's
  routed scaling factor), in the model's dtype and slot order (best expert first);
- the model's expert computation is untouched.

With ``balancer="none"`` the patched model computes what the unpatched one does.

The routers are registered on the model as ``model.moebal`` (a ModuleList, one per MoE layer
in model order), so the balancers' state (expert bias, dual prices) is in
``model.state_dict()`` under ``moebal.<i>.router.balancer.*`` (keys that ``save_pretrained``'s
renaming of the model's own modules leaves alone), moves with ``model.to()``, is written by
``save_pretrained`` and is copied by ``copy.deepcopy(model)`` (the copy routes as the model
does, with a balancer state and a handle of its own). Each router is first run once on a
random probe, unpatched and through moebal with no balancer; a router whose output moebal
would not reproduce (another transformers version) is refused. ``from_pretrained`` builds an
unpatched model and skips those keys; :func:`from_pretrained` here loads, re-patches with the
options saved in ``config.json`` and loads the balancer state (or do it by hand:
``patch_model(model)`` then ``handle.load_pretrained_state(path)``).

The model's own router aux loss (``output_router_logits=True``, ``router_aux_loss_coef``) is
computed by ``transformers`` from the router logits with a plain top-k of its own; it keeps
working after the patch but does not see which experts the balancer chose. With a moebal
balancer, turn it off (``output_router_logits=False``) and use moebal's: the aux loss and
z-loss of the last forward, summed over MoE layers (Megatron-core's convention), are
``handle.loss()``; when ``add_loss_to_output`` is True (default) the patch adds it to the
``loss`` the model returns when given labels, so ``Trainer`` picks it up unchanged.

Padding is not load: the models' MoE blocks do not see the attention mask, so the patch
catches the ``attention_mask`` given to the model's forward (``model(ids,
attention_mask=...)``, ``Trainer`` with a padding collator, ``generate``) and the tokens it
masks out are routed by the plain top-k of the scores, as the model routes them, but left out
of the loads, MaxVio, aux losses and every balancer's update.

Modules: :mod:`.families` (which router classes, how each routes), :mod:`.gate` (the adapter
a patched router runs, on moebal's one gate-and-router core), :mod:`.forward` (one model
forward: its attention mask, its routing log), :mod:`.record` (what the layers routed),
:mod:`.fit` (the router config and the probe), :mod:`.handle` (the patch handle),
:mod:`.checkpoint` (balancer state from a checkpoint), :mod:`.patch` (``patch_model``,
``from_pretrained``).
"""

from moebal.integrations.hf.families import SUPPORTED_ROUTERS, UNSUPPORTED_ROUTERS, GateSpec
from moebal.integrations.hf.fit import MODEL_BIAS_POLICIES
from moebal.integrations.hf.gate import GateAdapter
from moebal.integrations.hf.handle import PatchHandle, get_handle
from moebal.integrations.hf.patch import from_pretrained, patch_model
from moebal.integrations.hf.record import RoutingRecord

__all__ = [
    "GateAdapter",
    "GateSpec",
    "MODEL_BIAS_POLICIES",
    "PatchHandle",
    "RoutingRecord",
    "SUPPORTED_ROUTERS",
    "UNSUPPORTED_ROUTERS",
    "from_pretrained",
    "get_handle",
    "patch_model",
]
