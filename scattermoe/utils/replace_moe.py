"""``import scattermoe.utils.replace_moe``: the original ScatterMoE's one-line switch, kept for its users.

Importing it patches transformers' GPT-OSS and GraniteMoeHybrid modeling modules, the two families the original
patched, with ``scattermoe.integrations``: models built or loaded afterwards run their experts on scattermoe. (The
original replaced the classes' ``forward``, so it also reached models built before; here, import it first.) For
every other family, and for a model already loaded, use ``scattermoe.integrations.apply_scattermoe``.
"""

import logging

from ..integrations import apply_scattermoe_to_gpt_oss, apply_scattermoe_to_granitemoehybrid

logger = logging.getLogger(__name__)

PATCHED = []  # the families this import patched; a family this transformers lacks is logged, as the original did
for _patch in (apply_scattermoe_to_gpt_oss, apply_scattermoe_to_granitemoehybrid):
    _family = _patch.__name__[len("apply_scattermoe_to_"):]
    try:
        _patch()
    except (ImportError, ValueError) as _error:  # transformers missing, or too old to have the family
        logger.info("scattermoe: did not patch transformers' %s: %s", _family, _error)
    else:
        PATCHED.append(_family)
