"""Importers from other PEFT libraries' adapter files (AdapterHub: `slimtune.interop.adapterhub`)."""
