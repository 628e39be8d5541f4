"""The peers' own test suites (SAELens, sparsify) run unpatched and with flashsae patched in: ``make conformance``."""
