"""Drop-in replacements for the RL math of other trainers (verl, TRL, OpenRLHF), on instructrl_fast's fused ops.

One call installs them, in the habit of Liger's ``apply_liger_kernel_to_*``::

    from instructrl_fast.integrations import patch_verl, patch_trl, patch_openrlhf, unpatch
    patch_trl()    # before or after the trainer is imported
    ...
    unpatch()      # everything back as it was

A patch replaces each original function in the trainer's own module AND every copy of it held elsewhere: any
imported module's global (``from core_algos import agg_loss``), a class attribute (a method, installed as a
staticmethod), or a value in a module-level dict (verl's ``POLICY_LOSS_REGISTRY``, ``ADV_ESTIMATOR_REGISTRY``). It
finds them by identity with the original object in ``sys.modules``, so modules imported AFTER the patch pick up
ours from the trainer's module. Each ``patch_*`` returns a read-only ``{"module.name": original}`` of what it replaced
and raises ImportError when the trainer is not installed. The drop-ins themselves only need torch:
``instructrl_fast.integrations.{verl,trl,openrlhf}`` can be called directly.
"""

from __future__ import annotations

import importlib
import sys
import types

from instructrl_fast.integrations import openrlhf, trl, verl

__all__ = ["openrlhf", "patch_openrlhf", "patch_trl", "patch_verl", "trl", "unpatch", "verl"]

# (trainer module, attribute, our replacement); a missing attribute is skipped (another version of the trainer)
_VERL = [("verl.trainer.ppo.core_algos", name, getattr(verl, name)) for name in (
    "compute_gae_advantage_return", "kl_penalty", "kl_penalty_forward", "agg_loss", "compute_policy_loss",
    "compute_policy_loss_vanilla", "compute_value_loss", "compute_rewards") + verl.REGISTRY_DROP_INS]
_OPENRLHF = [("openrlhf.models.utils", name, getattr(openrlhf, name)) for name in (
    "compute_approx_kl", "compute_reward", "log_probs_from_logits")] + [
    ("openrlhf.trainer.ppo_utils.experience_maker", name, getattr(openrlhf, name)) for name in (
        "get_advantages_and_returns", "get_cumulative_returns")]
_TRL = [("trl.trainer.utils", name, getattr(trl, name)) for name in (
    "selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")] + [
    ("trl.kernels", "ChunkedLogProbFunction", trl.ChunkedLogProbFunction),
    ("trl.experimental.ppo.ppo_trainer", "masked_whiten", trl.masked_whiten)]
# importing these has side effects (TRL's experimental-API warning): they are patched once the user has imported them
_ONLY_IF_IMPORTED = ("trl.experimental.ppo.ppo_trainer",)

# every replacement made, in order: (container, key, original, kind) with kind "attr" (module or class) or "item"
_applied: list[tuple[object, str, object, str]] = []


def _import(module: str, trainer: str, *, required: bool):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if required:
            raise ImportError(f"patch_{trainer}() needs {trainer} installed: importing {module} failed ({e})") from e
        return None


def _find_in_class(obj, name) -> object:
    """The original as stored on a class: a function is wrapped in staticmethod / classmethod there or not."""
    raw = obj.__dict__.get(name)
    return raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw


def _originals(module, name: str) -> list:
    """The module's ``name``, else the ``name`` method of each class defined in the module (OpenRLHF's GAE is one);
    empty when this version of the trainer has neither."""
    if name in module.__dict__:
        return [module.__dict__[name]]
    classes = [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__]
    return [_find_in_class(cls, name) for cls in classes if name in cls.__dict__]


def _replace_everywhere(original, replacement, replaced: dict) -> None:
    """Point every module global, class attribute and module-level dict value that IS ``original`` at ours."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(module, types.ModuleType) or namespace is None:
            continue
        for key, value in list(namespace.items()):
            if value is original:
                _applied.append((module, key, value, "attr"))
                setattr(module, key, replacement)
                replaced[f"{module.__name__}.{key}"] = original
            elif type(value) is dict and not key.startswith("__"):  # plain dicts only: no lazy mapping is loaded
                for item_key, item in list(value.items()):
                    if item is original:
                        _applied.append((value, item_key, item, "item"))
                        value[item_key] = replacement
                        replaced[f"{module.__name__}.{key}[{item_key!r}]"] = original
            elif issubclass(type(value), type) and value.__dict__.get("__module__") == module.__name__:
                for attr in list(value.__dict__):
                    if _find_in_class(value, attr) is original:
                        _applied.append((value, attr, value.__dict__[attr], "attr"))
                        setattr(value, attr, staticmethod(replacement))
                        replaced[f"{module.__name__}.{value.__qualname__}.{attr}"] = original


def _patch(targets, trainer: str) -> types.MappingProxyType:
    _import(targets[0][0].split(".")[0], trainer, required=True)
    replaced: dict[str, object] = {}
    for module_name, name, replacement in targets:
        if module_name in _ONLY_IF_IMPORTED:
            module = sys.modules.get(module_name)
        else:
            module = _import(module_name, trainer, required=False)
        if module is None:
            continue
        for original in _originals(module, name):
            if original is not replacement:  # patching twice changes nothing
                _replace_everywhere(original, replacement, replaced)
    # read-only, and not a plain dict: a later patch's scan must not "replace" the originals listed in it
    return types.MappingProxyType(replaced)


def patch_verl() -> types.MappingProxyType:
    """Install ``integrations.verl`` into verl's ``core_algos`` and every copy (registries included)."""
    return _patch(_VERL, "verl")


def patch_openrlhf() -> types.MappingProxyType:
    """Install ``integrations.openrlhf`` into ``openrlhf.models.utils``, the experience makers and every copy."""
    return _patch(_OPENRLHF, "openrlhf")


def patch_trl() -> types.MappingProxyType:
    """Install ``integrations.trl`` into ``trl.trainer.utils``, ``trl.kernels`` (and the PPO trainer's module where
    the installed TRL has one and it is imported) and every copy."""
    return _patch(_TRL, "trl")


def unpatch() -> None:
    """Undo every ``patch_*`` call, most recent first."""
    while _applied:
        container, key, original, kind = _applied.pop()
        if kind == "item":
            container[key] = original
        else:
            setattr(container, key, original)
