"""Code generation from a validated integer program (below the exporters and backends that use it).

``ivit.codegen.c`` lowers each op of the op set to C99 (one lowering per op, int8/int16/int32 only,
64-bit products only where the op's reference does) and plans a static arena; the C99 exporter
(``ivit.export.c99``) and the compiled CPU backend (``ivit.backends.compiled``) both build on it.
"""
