"""Kernel builds from a series manifest (``patches/<name>/series.toml``).

Modules: :mod:`manifest` (schema), :mod:`source` (base tree), :mod:`series`
(b4 / mbox / patch dir), :mod:`apply` (git am -3), :mod:`config` (base config +
fragments), :mod:`toolchain` (tuxmake/make, runtime, compiler),
:mod:`build` (cached builds: ``build_kernel`` -> ``KernelBuild``),
:mod:`bootcheck` (boot a built kernel under TCG and read what it exposes).
"""
