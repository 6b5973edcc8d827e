-- Orthanc auto-routing for ct-zeroshot: every CT series, once stable (no new instance for StableAge
-- seconds), goes to the listener. Series of other modalities, the listener's own SRs among them, stay:
-- routing the whole study would send it back each time its SR arrives, and each resend would produce
-- a corrected SR. Orthanc identifiers are hashes, so the log carries no patient data.
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'CT' then
    print('ct-zeroshot: routing stable CT series ' .. seriesId)
    -- The REST call takes a series (Lua's SendToModality takes single instances in Orthanc 1.10).
    RestApiPost('/modalities/ctzeroshot/store', seriesId)
  end
end
