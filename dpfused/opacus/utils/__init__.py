"""Opacus' ``opacus.utils`` modules that user code imports: ``batch_memory_manager``
(``BatchMemoryManager``) and ``fsdp_utils`` (``FSDP2Wrapper``)."""
