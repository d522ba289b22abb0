-- Argo CD health check for tensorfleet.io InferenceService and Engine.
-- InferenceService reports the conditions Ready, Progressing and Degraded; Engine reports Ready, Building and
-- Failed (a failed attempt stays Failed while the next one builds). Both carry observedGeneration. Only these
-- are read, never timestamps, so a steady object keeps one health and the operator writes nothing while
-- converged: no Argo CD diff churn.
local hs = {}

local function find(conditions, kind)
  for _, condition in ipairs(conditions) do
    if condition.type == kind then
      return condition
    end
  end
  return nil
end

local function describe(condition)
  if condition == nil then
    return ""
  end
  local reason = condition.reason or ""
  if condition.message ~= nil and condition.message ~= "" then
    return reason .. ": " .. condition.message
  end
  return reason
end

local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the tensorfleet operator to report status"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the tensorfleet operator to observe generation " .. generation
  return hs
end

local ready = find(status.conditions, "Ready")

if obj.kind == "Engine" then
  local building = find(status.conditions, "Building")
  local failed = find(status.conditions, "Failed")
  if building ~= nil and building.status == "True" then
    -- building or fetching; after a failure this is the retry, after corruption the re-verification
    hs.status = "Progressing"
    hs.message = describe(building)
  elseif ready ~= nil and ready.status == "True" then
    hs.status = "Healthy"
    hs.message = describe(ready)
  elseif failed ~= nil and failed.status == "True" then
    hs.status = "Degraded"
    hs.message = describe(failed)
  else
    hs.status = "Progressing"
    hs.message = describe(ready)
  end
  return hs
end

local progressing = find(status.conditions, "Progressing")
local degraded = find(status.conditions, "Degraded")

if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end

if ready ~= nil and ready.status == "True" then
  if progressing ~= nil and progressing.status == "True" then
    hs.status = "Progressing"
    hs.message = describe(progressing)
    return hs
  end
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end

if ready ~= nil and ready.reason == "ScaledToZero" then
  hs.status = "Suspended"
  hs.message = describe(ready)
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = describe(ready)
else
  hs.message = describe(progressing)
end
return hs
