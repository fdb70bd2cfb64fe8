"""Upstream facts from bitsandbytes (functional.py, 0.50.x), kept as data.

NF4_CODE: the 16 NormalFloat-4 values (``get_4bit_type("nf4")``), exact float32 values, code 7 is 0.0.
Storage layout (``quantize_4bit``): flattened row-major weight, blocks of 64, absmax per block (fp32),
two codes per byte with element 2i in the high nibble. Double quant: ``offset = mean(absmax)``,
``absmax - offset`` quantized blockwise (blocks of 256) against the signed 8-bit dynamic map.
"""

NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
# Dynamic 8-bit map (``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``) parameters.
DYNAMIC_MAP_EXPONENT_BITS = 7
DYNAMIC_MAP_TOTAL_BITS = 8
# Suffixes of the serialized quant state beside ``<module>.weight``.
QUANT_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                        "quant_state.bitsandbytes__nf4")
