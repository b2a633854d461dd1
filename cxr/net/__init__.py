"""`cxr` on the hospital network: a DICOM Storage SCP (`cxr listen`, with a durable spool and
journal) and DICOMweb (`cxr index RUN dicomweb:URL`). Needs the `net` extra (pynetdicom,
dicomweb-client)."""
