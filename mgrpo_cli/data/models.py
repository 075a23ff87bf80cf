"""Deprecated alias, kept for one release: model loading moved to ``mgrpo_cli.models``
(``models.loading``: loading, LoRA, export, the reference policy; ``models.tiny``: the embedded tiny
model and its byte tokenizer). Importing this module warns and re-exports their public names."""
import warnings

from mgrpo_cli.models.loading import *  # noqa: F403
from mgrpo_cli.models.tiny import *  # noqa: F403

warnings.warn("mgrpo_cli.data.models moved to mgrpo_cli.models.loading and mgrpo_cli.models.tiny; "
              "this alias goes in the next release", DeprecationWarning, stacklevel=2)
