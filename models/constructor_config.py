"""A model's constructor arguments as a dict, read from its signature: what a checkpoint stores to rebuild it
(models.model_config / build_from_config), with no hand-written copy to fall out of step with the signature."""
import inspect


def constructor_arguments(model_class, arguments):
    """{name: arguments[name]} for every parameter of model_class's constructor; `arguments` is its locals()."""
    return {name: arguments[name] for name in inspect.signature(model_class).parameters}
