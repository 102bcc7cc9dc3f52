"""Every backbone of the paper by name: one table of model families, one create_model (Park et al., Sec. 5).

    model = create_model("DiT-B/2", routing="dtr")                     # a zoo entry
    model = create_model("ADM-FFHQ64", model_channels=64, routing="dtr")  # overrides replace any argument
    model = build_from_config(checkpoint["model_config"])              # what model_config(...) stored
    model = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)    # official DiT's call, unchecked

A family is a constructor plus its zoo, official DiT's {name: callable taking keyword overrides}; a new
backbone is one more row of MODEL_FAMILIES. Every model keeps its full constructor arguments in `model.config`, so
model_config(name, model) is all a checkpoint needs to rebuild it.
"""
import inspect
import numbers
from dataclasses import dataclass

from models.adm import ADM, ADM_models
from models.dit import DiT, DiT_models
from models.text_dit import TextDiT, TextDiT_models


@dataclass(frozen=True)
class ModelFamily:
    """A backbone class and its zoo: {name: functools.partial(constructor, **preset arguments)}."""
    constructor: type
    zoo: dict

    @property
    def presets(self):
        """{name: the preset constructor arguments of that zoo entry}."""
        return {name: dict(entry.keywords) for name, entry in self.zoo.items()}

    def arguments(self):
        """Names of the constructor's keyword arguments (what overrides may set)."""
        return [name for name in inspect.signature(self.constructor).parameters if name != "self"]


MODEL_FAMILIES = {
    "DiT": ModelFamily(DiT, DiT_models),   # Peebles & Xie (2023), latent or pixel space
    "ADM": ModelFamily(ADM, ADM_models),   # Dhariwal & Nichol (2021), pixel space 64x64
    "TextDiT": ModelFamily(TextDiT, TextDiT_models),  # text-to-image DiT of the paper's App. C (MS-COCO)
}
# Model names that train.py checkpoints carry for DiTs built outside the zoo ("DiT-custom", "custom").
LEGACY_NAMES = {"DiT-custom": "DiT", "custom": "DiT"}


def model_names():
    """Every zoo name, family by family."""
    return [name for family in MODEL_FAMILIES.values() for name in family.zoo]


def family_of(name):
    """The ModelFamily that holds zoo name `name`; ValueError listing the valid names otherwise."""
    for family in MODEL_FAMILIES.values():
        if name in family.zoo:
            return family
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(model_names())}")


def check_overrides(name, overrides):
    """Raise ValueError naming every override that is not a constructor argument of the model's family, or the
    first whose value has the wrong type for its argument."""
    family = family_of(name)
    valid = family.arguments()
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"{name} ({family.constructor.__name__}) has no argument {', '.join(unknown)}; "
                         f"valid: {', '.join(valid)}")
    check_override_types(name, overrides)


def _is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _expected_type(default):
    """(what an override of an argument with this default must be, in words; its test)."""
    if isinstance(default, bool):
        return "true or false", lambda v: isinstance(v, bool)
    if _is_integer(default):
        return "an integer", _is_integer
    if _is_number(default):
        return "a number", _is_number
    if isinstance(default, str):
        return "a string", lambda v: isinstance(v, str)
    if isinstance(default, (tuple, list)):  # ADM's channel_mult / attention_resolutions: one int is a 1-tuple
        return ("an integer or a list of integers, e.g. 8 or [32, 16, 8]",
                lambda v: _is_integer(v) or isinstance(v, str) or (
                    isinstance(v, (tuple, list)) and all(_is_integer(x) for x in v)))
    # default None: the label / caption dropout probabilities (None = the model's own choice)
    return "a number or null", lambda v: v is None or _is_number(v)


def check_override_types(name, overrides):
    """Raise ValueError naming the first override whose value has the wrong type (e.g. depth=1.5, learn_sigma=2)."""
    parameters = inspect.signature(family_of(name).constructor).parameters
    for key, value in overrides.items():
        if key not in parameters:
            continue
        expected, fits = _expected_type(parameters[key].default)
        if not fits(value):
            raise ValueError(f"{name} argument {key} expects {expected}, got {value!r} ({type(value).__name__})")


def create_model(name, **overrides):
    """Build zoo model `name`, overrides replacing any of its constructor arguments."""
    check_overrides(name, overrides)
    family = family_of(name)
    return family.zoo[name](**overrides)


def model_config(name, model):
    """{"model": name, **every constructor argument}: what a checkpoint stores to rebuild the model."""
    return {"model": name, **model.config}


def build_from_config(config, **overrides):
    """Rebuild a model from model_config(...) (overrides win, e.g. grad_checkpointing=False)."""
    config = dict(config)
    name = config.pop("model")
    if name in LEGACY_NAMES:
        family = MODEL_FAMILIES[LEGACY_NAMES[name]]
        return family.constructor(**{**config, **overrides})
    return create_model(name, **{**config, **overrides})
