"""Results for hospital systems: DICOM (Structured Report, parametric map) and FHIR R4 (docs/interoperability.md)."""
