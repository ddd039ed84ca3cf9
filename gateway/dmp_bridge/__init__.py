"""The DMP bridge: extraction (CDA, IHE XDM, PDF), patient identification, filing into the record, access policy and the FHIR API."""
