"""Programs run by path inside a target interpreter.

They import only vLLM, lmcache and the standard library.
"""
