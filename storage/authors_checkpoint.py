"""The DTR authors' checkpoints: {"model", "ema", "opt", "config"} with an OmegaConf config, read without running code.

Their train.py saves the Hydra config it ran with (`config`: an omegaconf DictConfig) beside the
weights; their models carry each block's mask table as `blocks.{i}.routing._unit_mapping`.
torch.load(weights_only=True) refuses the DictConfig, and a plain torch.load would let the file run
arbitrary code. Here torch's restricted unpickler admits the OmegaConf container and node classes,
and nothing else, as inert stand-ins: the file's objects only hand over their pickled state, which is
turned into plain dicts and lists. No OmegaConf code runs, and omegaconf need not be installed.

Settings read from the release's config (config/base_config.yaml, config/models/DiT.yaml there):
    model           models.name                      "DiT-L/2"
    num_classes     models.param.num_classes         usually "${data.num_classes}", resolved here
    image_size      general.image_size               pixels; latents are image_size / 8
    routing         models.routing.init_method       "DTR" -> dtr, "random" -> random
    beta            models.routing.sharing_ratio     0.8
    alpha           models.routing.alpha if present, else 4 (the release hard-codes alpha = 4)
    noise_schedule  general.schedule_name            "cosine" (the release's default) or "linear"
    vae             general.vae                      "ema" or "mse"
"""
import collections
import re
import typing

import torch

from foundation.usage_error import UsageError

# Every class an OmegaConf container pickles as (omegaconf 2.0 - 2.3), by the name the pickle uses.
OMEGACONF_CLASSES = (
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode", "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.PathNode",
)
# Plain objects the metadata refers to (ref_type=typing.Any, object_type=dict, resolver_cache=defaultdict(dict)).
METADATA_GLOBALS = (typing.Any, dict, list, int, float, str, bool, collections.defaultdict)
ROUTING_NAMES = {"DTR": "dtr", "random": "random"}  # the release's init_method -> our routing kind
RELEASE_ALPHA = 4.0  # create_mask_tasks(..., alpha=4) in the release; its config has no alpha
_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


class PickledOmegaConfObject:
    """Inert stand-in for one pickled OmegaConf object: keeps its state, runs nothing."""

    pickled_as = ""

    def __setstate__(self, state):
        self.state = state


def _stand_ins():
    """One stand-in subclass per admitted OmegaConf class name, as (class, name) pairs for torch."""
    return [(type(name.rsplit(".", 1)[1], (PickledOmegaConfObject,), {"pickled_as": name}), name)
            for name in OMEGACONF_CLASSES]


def load_with_omegaconf_config(path, extra_globals=()):
    """torch.load a checkpoint with weights_only=True, admitting OmegaConf containers (and extra_globals) as data."""
    with torch.serialization.safe_globals([*_stand_ins(), *METADATA_GLOBALS, *extra_globals]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), PickledOmegaConfObject):
        ckpt["config"] = _resolve_interpolations(_to_plain(ckpt["config"]))
    return ckpt


def _to_plain(obj):
    """Plain dicts / lists / values from pickled OmegaConf containers and nodes."""
    if isinstance(obj, PickledOmegaConfObject):
        state = obj.state[0] if isinstance(obj.state, tuple) else obj.state
        if obj.pickled_as.endswith(("DictConfig", "ListConfig")):
            return _to_plain(state.get("_content"))
        return _to_plain(state.get("_val"))
    if isinstance(obj, dict):
        return {key: _to_plain(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_to_plain(value) for value in obj]
    return obj


def _lookup(config, dotted):
    """config["a"]["b"] for "a.b"; KeyError if any part is missing."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _resolve_interpolations(config, root=None, depth=0):
    """Replace whole-value "${a.b}" references by their target; anything else is left as written."""
    root = config if root is None else root
    if isinstance(config, dict):
        return {key: _resolve_interpolations(value, root, depth) for key, value in config.items()}
    if isinstance(config, list):
        return [_resolve_interpolations(value, root, depth) for value in config]
    match = _INTERPOLATION.match(config) if isinstance(config, str) else None
    if match and depth < 8:  # a chain of references, not a cycle
        try:
            return _resolve_interpolations(_lookup(root, match.group(1)), root, depth + 1)
        except KeyError:
            return config
    return config


def release_settings(config):
    """Our settings (model, num_classes, image_size, routing, alpha, beta, noise_schedule, vae) from the
    release's plain config; a setting the config lacks or cannot resolve is None (flags then decide)."""
    def get(dotted, kind):
        try:
            value = _lookup(config, dotted)
        except KeyError:
            return None
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    routing = get("models.routing.init_method", str)
    if routing is not None and routing not in ROUTING_NAMES:
        raise UsageError(f"the checkpoint's models.routing.init_method {routing!r} is not one of the "
                         f"release's {sorted(ROUTING_NAMES)}")
    alpha = get("models.routing.alpha", (int, float))
    beta = get("models.routing.sharing_ratio", (int, float))
    return {
        "model": get("models.name", str) or get("model.name", str),  # DTR release, ANT release
        "num_classes": get("models.param.num_classes", int) or get("data.num_classes", int),
        "image_size": get("general.image_size", int),
        "routing": ROUTING_NAMES.get(routing),
        "alpha": float(alpha) if alpha is not None else (RELEASE_ALPHA if routing is not None else None),
        "beta": float(beta) if beta is not None else None,
        "noise_schedule": get("general.schedule_name", str),
        "vae": get("general.vae", str),
    }


def carries_release_routing_tables(state_dict):
    """The release's sign: its models store each block's mask table as blocks.{i}.routing._unit_mapping."""
    return any(key.endswith("routing._unit_mapping") for key in state_dict)
