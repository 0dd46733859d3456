"""Adaptive non-uniform quantization levels, ALQ and AMQ (Faghri et al. 2020): :mod:`.fit` fits them
(and builds uniform and exponential ones), :mod:`.apply` quantizes onto them.

A leaf: it imports nothing else from mpqflow. Both the weight quantizers (:mod:`mpqflow.quant`,
``QuantScheme.levels``) and the quantized gradient exchange (:mod:`mpqflow.comm`) use it, and the
exchange imports no quantizer code, so training (which runs the exchange) does not rerun when the
quantizers are edited.

    from mpqflow.levels.fit import alq_levels, fit_levels, fit_truncnorm, levels_for_bits
    from mpqflow.levels.apply import fake_quantize_levels, quantize_stochastic
"""
