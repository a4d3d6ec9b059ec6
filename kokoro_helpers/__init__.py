"""kokoro_helpers"""
