"""Named CKKS parameter sets ("HE profiles").

A profile fixes the ring dimension N, the modulus chain and the scale. Everyone in a federation
uses the same profile; its name travels in every message so a mismatch is rejected up front.

Security: the total modulus bit count stays within the HomomorphicEncryption.org standard's
128-bit bound for N (218 bits at N=8192, 438 at 16384, 881 at 32768); SEAL, which TenSEAL wraps,
refuses larger chains. HE-Adam needs ``3 + ceil(log2(degree + 1))`` multiplicative levels per
step (see ``coordinator/he_adam.py``), which rules out N=8192 at a 40-bit scale.
"""

from __future__ import annotations

from dataclasses import dataclass

# Upper bound on the total coefficient-modulus bits for 128-bit classical security
# (HomomorphicEncryption.org standard, ternary secrets), as enforced by SEAL.
MAX_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class HEProfile:
    """One CKKS parameter set."""

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    description: str

    @property
    def slots(self) -> int:
        """Real values packed into one ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def levels(self) -> int:
        """Multiplications (each followed by a rescale) a fresh ciphertext supports."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def headroom_bits(self) -> int:
        """log2 of the largest magnitude a fully consumed ciphertext can hold."""
        return self.coeff_mod_bit_sizes[0] - self.scale_bits

    @property
    def security_bits(self) -> int:
        return 128 if self.total_bits <= MAX_BITS_128.get(self.poly_modulus_degree, 0) else 0

    def max_chunk_bytes(self) -> int:
        """Generous upper bound on one serialized full-depth ciphertext (for size checks)."""
        raw = 2 * self.poly_modulus_degree * 8 * (len(self.coeff_mod_bit_sizes) - 1)
        return raw + 64 * 1024


PROFILES: dict[str, HEProfile] = {
    p.name: p
    for p in (
        HEProfile(
            name="n16k-d6",
            poly_modulus_degree=16384,
            coeff_mod_bit_sizes=(60, 40, 40, 40, 40, 40, 40, 60),
            scale_bits=40,
            description=(
                "Default. N=16384, 6 levels of 40 bits (360 of 438 bits, 128-bit secure), "
                "8192 slots. Fits one HE-Adam step with a degree-7 inverse-sqrt polynomial "
                "(interval up to B~4, error ~1e-4). ~177 bytes per parameter uploaded."
            ),
        ),
        HEProfile(
            name="n16k-d7",
            poly_modulus_degree=16384,
            coeff_mod_bit_sizes=(60, 40, 40, 40, 40, 40, 40, 40, 60),
            scale_bits=40,
            description=(
                "N=16384, 7 levels (400 of 438 bits, 128-bit secure), 8192 slots. Room for a "
                "degree-15 polynomial (wide interval, B up to 8, error ~5e-6), or the degree-7 "
                "step plus the robust defenses' plaintext clip factors (norm-bound, median-norm). "
                "~201 bytes per parameter."
            ),
        ),
        HEProfile(
            name="n8k-d2",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(60, 40, 40, 60),
            scale_bits=40,
            description=(
                "N=8192, 2 levels (200 of 218 bits, 128-bit secure), 4096 slots. Too shallow "
                "for HE-Adam (refused); for sum-only aggregation, tests and fuzzing. "
                "~81 bytes per parameter."
            ),
        ),
        HEProfile(
            name="n32k-d12",
            poly_modulus_degree=32768,
            coeff_mod_bit_sizes=(60,) + (40,) * 12 + (60,),
            scale_bits=40,
            description=(
                "N=32768, 12 levels (600 of 881 bits, 128-bit secure), 16384 slots. For deeper "
                "custom pipelines; about 4x slower per value than n16k. ~300 bytes per parameter."
            ),
        ),
    )
}

DEFAULT_PROFILE = "n16k-d6"


class UnknownProfileError(ValueError):
    """Raised for a profile name that is not in PROFILES."""


def get_profile(name: str) -> HEProfile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise UnknownProfileError(
            f"unknown HE profile {name!r}; known profiles: {known} (see `fedhe keygen --help`)"
        ) from None
