"""Ryzen kernel plugin: time the training and inference paths this CPU's features allow (detected by the core,
`ryzen_core.hardware`) and use the fastest that stays accurate."""
