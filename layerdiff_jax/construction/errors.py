"""The errors of data construction that stop a run before it starts. They sit apart from `config` and
`hf_models` so that both, and the stage builder between them, can raise them without importing each
other; the CLI reports either as a bad setting (exit code 2)."""


class ConstructionConfigError(ValueError):
    """A bad models YAML or command line; the message names the file or flag and the key."""


class ModelLoadError(ConstructionConfigError):
    """A stage's model folder is missing or holds the wrong kind of model; the message names both."""
