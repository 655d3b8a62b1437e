"""Application-level encryption: master key ring, envelope data keys, blind indexes."""
