"""The patient record's FHIR R4 API in the IHE MHD style (ITI-67, ITI-68), under the access policy."""
