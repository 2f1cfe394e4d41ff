"""The models, after timm: `registry` holds each zoo model's metadata, label set and weights, readable without
torch; `zoo` holds the factories, bound to their entries with `@register`, that build only an architecture, and
`load_model`, the one path that builds any model (zoo, torchvision or your own) and resolves its weights;
`classifier` is the interface every model has; `inceptionv1` is lucid's InceptionV1 in plain torch.
"""


def __getattr__(name: str) -> object:
    """`from atlas.models import load_model` (the README's, and this package's before `zoo`) still works; imported
    on use, so the registry stays readable without torch."""
    if name == "load_model":
        from atlas.models.zoo import load_model

        return load_model
    raise AttributeError(f"module 'atlas.models' has no attribute {name!r}")
