"""The training switch `loop.checkpointing`: which activations restok.models.recompute recomputes.

No torch: the params loader (restok.config) types `loop.checkpointing` with it, so a stage that only reads params
does not depend on the model code.
"""

from typing import Literal

Checkpointing = Literal["none", "blocks", "all"]
