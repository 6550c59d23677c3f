"""Export to the Hugging Face format (``normopt export --format hf``): the conversion
(convert.py), the folder writer (export.py), the parity gate (parity.py) and the modeling
file copied into exports of non-Llama models (modeling_normopt.py, which must never import
normopt: it runs where normopt is not installed)."""
