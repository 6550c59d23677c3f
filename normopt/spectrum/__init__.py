"""The NS-spectrum fit (``fit``) and ``normopt spectrum`` with its outputs (``report``)."""
