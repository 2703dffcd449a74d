"""Backends that ship with the core (the framework-native reference)."""
