"""Task adapters (instance, oriented, semantic) around the engine; no quantization code here."""
