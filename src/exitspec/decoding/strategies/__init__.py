"""The decoding strategies, one module each; each registers its factory with decoding/api.py, and
every one runs on the machinery in decoding/ (driver, verification, exits, drafting vocabularies)."""
