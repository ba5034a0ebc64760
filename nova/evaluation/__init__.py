"""`nova eval`: retrieval evaluation of embedding variants on BEIR-layout datasets."""
