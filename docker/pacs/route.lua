-- Orthanc auto-routing for ct-zeroshot: every CT series, once stable (no new instance for StableAge
-- seconds), goes to the listener. Series of other modalities, the listener's own SRs among them, stay:
-- routing the whole study would send it back each time its SR arrives, and each resend would produce
-- a corrected SR. Orthanc identifiers are hashes, so the log carries no patient data.
--
-- Each route is an asynchronous store job, so a route that fails (the listener restarting, the
-- network down) is not lost: it stays in Orthanc's job list as failed (POST /jobs/ID/resubmit resends
-- it) and is resubmitted automatically, up to MAX_ATTEMPTS times, whenever the next series is routed.
-- Orthanc 1.10 (Debian 12) has no timer for Lua (OnHeartBeat came in 1.11), and sleeping here would
-- block Orthanc's one Lua context for every other callback.

local MAX_ATTEMPTS = 20
local attempts = {}  -- job ID -> attempts so far, for the route jobs this script submitted
local waiting = {}   -- job IDs of failed routes waiting to be resubmitted

local function resubmit_waiting()
  for job in pairs(waiting) do
    waiting[job] = nil
    if RestApiPost('/jobs/' .. job .. '/resubmit', '') ~= nil then
      attempts[job] = attempts[job] + 1
      print('ct-zeroshot: resubmitted route job ' .. job .. ' (attempt ' .. attempts[job] .. ')')
    end
  end
end

function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] ~= 'CT' then
    return
  end
  resubmit_waiting()
  print('ct-zeroshot: routing stable CT series ' .. seriesId)
  -- The REST call takes a series (Lua's SendToModality takes single instances in Orthanc 1.10).
  local request = DumpJson({ Resources = { seriesId }, Asynchronous = true }, true)
  local answer = RestApiPost('/modalities/ctzeroshot/store', request)
  if answer == nil then
    print('ct-zeroshot: could not submit the route of series ' .. seriesId .. '; resend it from Orthanc')
    return
  end
  local job = ParseJson(answer)['ID']
  if job == nil then
    print('ct-zeroshot: Orthanc answered the route of series ' .. seriesId .. ' without a job; resend it from Orthanc')
    return
  end
  attempts[job] = 1
end

function OnJobFailure(jobId)
  local n = attempts[jobId]
  if n == nil then
    return
  end
  if n >= MAX_ATTEMPTS then
    attempts[jobId] = nil
    print('ct-zeroshot: route job ' .. jobId .. ' failed ' .. n .. ' times; left failed in the job list'
      .. ' (POST /jobs/' .. jobId .. '/resubmit resends it)')
    return
  end
  waiting[jobId] = true
  print('ct-zeroshot: route job ' .. jobId .. ' failed (listener unreachable?); resubmitted with the next routed series')
end

function OnJobSuccess(jobId)
  attempts[jobId] = nil
end
