"""Integrations with the frameworks people already train MoE models in.

Each integration is its own module and imports its framework lazily, so ``import moebal``
never needs them: ``moebal.integrations.hf`` needs ``transformers`` (``pip install
moebal[hf]``).
"""
