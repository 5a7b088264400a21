"""GeneratorConfig: the generator's model config (params section `generator`) and its derived layout sizes.

No torch: the params loader (restok.config) imports this module, so a stage that only reads params does not
depend on the model code in restok.models.generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Mode = Literal["har", "ar"]  # params generator.mode: an enum in the schema
MODES = get_args(Mode)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class GeneratorConfig:
    """Model-only config of the generator (params section `generator`); defaults = the paper's GPT-L.

    `ffn_hidden` None applies LlamaGen's rule round_up(int(2 * 4 * dim / 3), ffn_multiple_of) (2816 for 1024).
    `spe_token_num` None means num_tokens - 1, the official table size (only num_tokens / 2 - 1 rows are used,
    the rest are kept for checkpoint shape). The class table has num_classes + 1 rows (last = null class for
    CFG) when class_dropout_prob > 0, as in the official LabelEmbedder.
    """

    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    ffn_hidden: int | None = None
    ffn_multiple_of: int = 256
    vocab_size: int = 8192
    num_tokens: int = 128
    ar_token_num: int = 4
    spe_token_num: int | None = None
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    token_dropout: float = 0.1
    attn_dropout: float = 0.0
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    init_std: float = 0.02
    mode: Mode = "har"

    def __post_init__(self):
        for name in ("dim", "n_layer", "n_head", "ffn_multiple_of", "vocab_size", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"generator.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_head or (self.dim // self.n_head) % 2:
            raise ValueError(f"generator.dim={self.dim} must split into n_head={self.n_head} heads of even width")
        if self.mode not in MODES:
            raise ValueError(f"generator.mode={self.mode!r}; allowed: {', '.join(MODES)}")
        if not _is_power_of_two(self.num_tokens) or self.num_tokens < 2:
            raise ValueError(f"generator.num_tokens must be a power of two >= 2, got {self.num_tokens}")
        if not _is_power_of_two(self.ar_token_num) or self.ar_token_num >= self.num_tokens:
            raise ValueError(
                f"generator.ar_token_num must be a power of two below num_tokens={self.num_tokens}, "
                f"got {self.ar_token_num}"
            )
        if self.mode == "ar" and self.spe_token_num not in (None, 0):
            raise ValueError(
                f"generator.spe_token_num={self.spe_token_num} but mode 'ar' has no special tokens; remove the key"
            )
        if self.mode == "har" and self.spe_token_num is not None and self.spe_token_num < self.num_tokens // 2 - 1:
            raise ValueError(
                f"generator.spe_token_num must be >= num_tokens/2 - 1 = {self.num_tokens // 2 - 1} "
                f"(the specials HAR uses), got {self.spe_token_num}"
            )
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ValueError(f"generator.ffn_hidden must be >= 1 or null, got {self.ffn_hidden}")
        for name in ("class_dropout_prob", "token_dropout", "attn_dropout", "resid_dropout", "ffn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"generator.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.rope_base <= 1 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError(
                f"generator.rope_base must be > 1 and norm_eps, init_std > 0; got {self.rope_base}, "
                f"{self.norm_eps}, {self.init_std}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        m = self.ffn_multiple_of
        return -(-int(2 * 4 * self.dim / 3) // m) * m

    @property
    def num_special(self) -> int:
        if self.mode == "ar":
            return 0
        return self.num_tokens - 1 if self.spe_token_num is None else self.spe_token_num

    @property
    def null_class(self) -> int | None:
        """Row of the null (unconditional) class, or None when the model was built without label dropout."""
        return self.num_classes if self.class_dropout_prob > 0 else None

    @property
    def block_sizes(self) -> list[int]:
        """Sampling blocks (= inference passes): [1] * A + [A, 2A, ..., T/2] for HAR, [1] * T for AR."""
        if self.mode == "ar":
            return [1] * self.num_tokens
        sizes, k = [1] * self.ar_token_num, self.ar_token_num
        while k < self.num_tokens:
            sizes.append(k)
            k *= 2
        return sizes

    @property
    def cache_len(self) -> int:
        """KV-cache slots: round_up(1 + T, 8) as the official sampler (136 for 128); slots >= T are never written."""
        return -(-(self.num_tokens + 1) // 8) * 8
