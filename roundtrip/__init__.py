"""roundtrip: prove e-mail works end to end."""
