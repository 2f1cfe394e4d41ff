"""The models, after timm: `registry` holds each zoo model's metadata, label set and weights, readable without
torch; `zoo` holds the factories, bound to their entries with `@register`, that build only an architecture, and
`load_model`, the one path that builds any model (zoo, torchvision or your own) and resolves its weights;
`classifier` is the interface every model has; `inceptionv1` is lucid's InceptionV1 in plain torch.
"""
